"""Compose the studio from a registry of tabs and launch it with login, file-route limits and the page JS.

``TABS`` is a plain dict: key -> ``Tab(title, role, build)``. A builder gets the ``AppContext`` and
the ``gr.Blocks`` (to add its own load events) and registers its handlers as closures over the
context. Another module adds a tab by adding an entry here (e.g. "rounds", "data", "export"; role
"admin"). Tabs a user's role may not use are hidden at load, but the real guard is in every handler.

Gradio serves files only from ``<workspace>/images``; the database (and its WAL), the config,
owner.json, runs/ and checkpoints/ are on ``blocked_paths`` besides not being allowed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.server import AppContext, admin_api, auth, data_tab, export_tab, review, rounds_tab
from app.server.runner import studio_of
from storage import users as users_db

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class Tab:
    title: str
    role: str
    """least role that may see and use the tab: annotator or admin"""
    build: Callable[[AppContext, gr.Blocks], None]


TABS: dict[str, Tab] = {
    "review": Tab("Review", "annotator", review.build),
    "users": Tab("Users", "admin", auth.build_users_tab),
    "rounds": Tab("Rounds", "admin", rounds_tab.build),
    "data": Tab("Data", "admin", data_tab.build),
    "export": Tab("Export", "admin", export_tab.build),
}


def build_app(ctx: AppContext, tabs: dict[str, Tab] | None = None) -> gr.Blocks:
    """The Gradio app for one open workspace (call ``launch`` to serve it)."""
    tabs = TABS if tabs is None else tabs
    with gr.Blocks(title=f"prefloop · {ctx.ws.config.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"### prefloop · {ctx.ws.config.name}")
        blocks = {}
        with gr.Tabs():
            for key, tab in tabs.items():
                with gr.Tab(tab.title, id=key, visible=tab.role == "annotator") as t:
                    tab.build(ctx, demo)
                blocks[key] = t

        def show_tabs(request: gr.Request):
            who = auth.as_gr_error(review.whoami, ctx, auth.user_of(request))
            return {t: gr.Tab(visible=users_db.role_allows(who["role"], tabs[k].role)) for k, t in blocks.items()}

        demo.load(show_tabs, None, list(blocks.values()), api_visibility="private")
    demo.queue(default_concurrency_limit=ctx.concurrency)
    return demo


def blocked_paths(ctx: AppContext) -> list[str]:
    lay = ctx.ws.lay
    paths = [lay.db, lay.db.with_name(lay.db.name + ".wal"), lay.config, lay.owner, lay.runs, lay.checkpoints]
    paths += [lay.root / admin_api.TOKEN_NAME, lay.root / admin_api.INFO_NAME]
    return [str(p) for p in paths]


def page_head() -> str:
    return "<script>\n" + (STATIC / "review.js").read_text(encoding="utf-8") + "\n</script>"


def launch(ctx: AppContext, host: str = "127.0.0.1", port: int | None = 7860, *, prevent_thread_lock: bool = False,
           quiet: bool = False, root_path: str | None = None) -> tuple[gr.Blocks, str]:
    """Build and serve the app; returns (blocks, local url). Blocks the thread unless ``prevent_thread_lock``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(ctx)
    checker = auth.Authenticator(ctx)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, auth=checker.check,
        auth_message=f"prefloop · {ctx.ws.config.name}: sign in with the name and password an admin gave you",
        allowed_paths=[str(ctx.ws.lay.images), str(studio_of(ctx).downloads)], blocked_paths=blocked_paths(ctx),
        prevent_thread_lock=True, show_error=True, quiet=quiet, root_path=root_path,
        css=(STATIC / "review.css").read_text(encoding="utf-8"), head=page_head(),
        footer_links=["api"], ssr_mode=False, enable_monitoring=False, mcp_server=False, max_file_size="500mb",
        run_history=False, share=False, inbrowser=False,
    )
    log.info("prefloop serve: %s on %s", ctx.ws.root, url)
    admin_api.mount(ctx, demo, host)  # CLI forwarding: admin.json + admin.token (0600) in the workspace
    if not prevent_thread_lock:
        demo.block_thread()
    return demo, url
