// Render the math that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \] in
// <span|div class="arithmatex">, with the KaTeX files vendored in docs/assets/katex (no network).
// document$ is Material's page observable (also fires on instant navigation).
function renderKatex(root) {
  root.querySelectorAll(".arithmatex").forEach(function (el) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(function ({ body }) { renderKatex(body); });
} else {
  document.addEventListener("DOMContentLoaded", function () { renderKatex(document.body); });
}
