// prefloop review screen: keyboard shortcuts, image zoom and active-time tracking.
// Loaded once through launch(head=...). It only clicks elements the page already has (by elem_id);
// it never inserts HTML.
(() => {
  if (window.__pfReview) return;
  window.__pfReview = true;

  // Active time: a second counts when there was input in the last IDLE_MS and the tab is visible.
  const IDLE_MS = 60000;
  let active = 0, last = Date.now(), tick = Date.now();
  const touch = () => { last = Date.now(); };
  ["keydown", "mousemove", "mousedown", "wheel", "scroll", "touchstart"].forEach((e) =>
    document.addEventListener(e, touch, { passive: true, capture: true }));
  setInterval(() => {
    const now = Date.now();
    if (now - last < IDLE_MS && !document.hidden) active += now - tick;
    tick = now;
  }, 1000);
  window.pfTakeActive = () => { const s = Math.round(active / 100) / 10; active = 0; return s; };

  const q = (sel) => document.querySelector(sel);
  const click = (id) => {
    const el = q("#" + id);
    if (!el) return false;
    (el.tagName === "BUTTON" ? el : el.querySelector("button") || el).click();
    return true;
  };
  const pick = (id, i) => {
    const inputs = document.querySelectorAll("#" + id + " input[type=radio]");
    if (inputs[i]) inputs[i].click();
  };
  const toggle = (id) => { const box = q("#" + id + " input[type=checkbox]"); if (box) box.click(); };
  const zoom = () => { const im = q("#pf-item .pf-image"); if (im) im.classList.toggle("pf-zoomed"); };

  document.addEventListener("click", (ev) => {
    const img = ev.target.closest && ev.target.closest("#pf-item .pf-image img");
    if (img) zoom();
  });

  document.addEventListener("keydown", (ev) => {
    if (!q("#pf-item") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    const typing = t && (t.tagName === "TEXTAREA" || t.isContentEditable ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(t.type)));
    if (typing) {
      if (ev.key === "Escape") t.blur();
      return;
    }
    if (t && t.tagName === "BUTTON" && ev.key === "Enter") return;  // the button's own Enter
    const m = /^(?:Digit|Numpad)([1-9])$/.exec(ev.code || "");
    if (m) { pick(ev.shiftKey ? "pf-rejected" : "pf-chosen", Number(m[1]) - 1); ev.preventDefault(); return; }
    const handled = {
      Enter: () => click("pf-submit"),
      a: () => click("pf-confirm"),
      s: () => click("pf-skip"),
      x: () => toggle("pf-allbad"),
      b: () => click("pf-undo"),
      Backspace: () => click("pf-undo"),
      z: () => zoom(),
      Escape: () => { const im = q("#pf-item .pf-image.pf-zoomed"); if (im) im.classList.remove("pf-zoomed"); },
    }[ev.key.length === 1 ? ev.key.toLowerCase() : ev.key];
    if (handled) { handled(); ev.preventDefault(); }
  });
})();
