// Small DOM helpers. Data is only ever inserted with textContent (never innerHTML), and styles go
// through classes or the CSSOM: the page is served under a strict CSP (no inline script or style).

export const $ = (sel) => document.querySelector(sel);

/** A new `<tag>` with class `cls` and text `text` (both optional). */
export const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};

export const setText = (sel, text) => { $(sel).textContent = text; };

/** Shows `text` in the note `sel` (kind "error" or "off" styles it), or hides it when empty. */
export function showNote(sel, text, kind, title) {
  const e = $(sel);
  e.textContent = text || "";
  e.className = "note" + (kind ? " note-" + kind : "");
  e.title = title || "";
  e.hidden = !text;
}

let toastTimer = 0;
/** A message at the bottom of the page for four seconds. */
export function toast(text, isError) {
  const t = $("#toast");
  t.textContent = text;
  t.className = "toast" + (isError ? " toast-error" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}
