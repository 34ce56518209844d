"""The single page ``imgfeat serve`` shows at ``/``: pick or drop an image, see the label, bars, and the heat map.

Plain HTML and JavaScript (no external assets: it works on machines without internet access). Labels come from
the JSON of ``/predict`` (UTF-8), not from ``/explain``'s percent-encoded headers; a /health status other than
"ok" is shown as an error.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgfeat: try the model</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1d2330; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  .muted { color: #667; font-size: 0.9rem; }
  #drop { border: 2px dashed #9aa4b8; border-radius: 10px; padding: 2rem; text-align: center; cursor: pointer;
          background: #f6f8fb; margin: 1rem 0; }
  #drop.over { background: #e3ecfb; border-color: #3b6fd8; }
  .row { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
  .row figure { margin: 0; }
  .row img { max-width: 26rem; max-height: 26rem; border-radius: 6px; background: #000; }
  figcaption { font-size: 0.85rem; color: #556; }
  #label { font-size: 1.6rem; font-weight: 600; margin: 0.5rem 0; }
  .bar { display: flex; align-items: center; gap: 0.5rem; margin: 0.25rem 0; }
  .bar span.name { width: 9rem; text-align: right; }
  .bar div.track { background: #e6e9ef; width: 16rem; height: 1rem; border-radius: 4px; overflow: hidden; }
  .bar div.fill { background: #3b6fd8; height: 100%; }
  #error { color: #b00020; font-weight: 600; }
  #token-row { display: none; margin: 0.5rem 0; }
</style>
</head>
<body>
<h1>imgfeat: try the model</h1>
<div class="muted" id="model">loading model information...</div>
<div id="token-row">Token: <input id="token" type="password" size="30" autocomplete="off"></div>
<div id="drop" tabindex="0">Drop a chest X-ray here (PNG, JPEG, DICOM), or click to pick a file
  <input id="file" type="file" accept="image/*,.dcm,.dicom,application/dicom" hidden></div>
<div id="error" role="alert"></div>
<div id="result" hidden>
  <div id="label"></div>
  <div id="bars"></div>
  <div class="muted" id="timing"></div>
  <div class="row">
    <figure><img id="original" alt="the uploaded image"><figcaption>uploaded image</figcaption></figure>
    <figure><img id="heatmap" alt="where the model looked"><figcaption id="heatcap">where the model looked</figcaption></figure>
  </div>
</div>
<p class="muted">The heat map shows which regions raised the score of the predicted class (see docs/serving.md for
how it is computed and its limits). Not a medical device: research use only.</p>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const tokenRow = document.getElementById("token-row"), tokenInput = document.getElementById("token");
fetch("health").then(r => r.json()).then(h => {
  const m = h.model;
  document.getElementById("model").textContent =
    `${m.backbone} (${m.engine}, weights ${String(m.weights_id).slice(0, 28)}) + ${m.head}; classes: ${m.labels.join(", ")}`;
  if (h.auth) tokenRow.style.display = "block";
  if (h.status !== "ok") document.getElementById("error").textContent =
    `the server's model is not running (health: ${h.status}); restart imgfeat serve`;
});
drop.addEventListener("click", () => input.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") input.click(); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });

async function send(file) {
  const error = document.getElementById("error"), result = document.getElementById("result");
  error.textContent = ""; result.hidden = true;
  const form = new FormData(); form.append("file", file, file.name);
  const headers = tokenInput.value ? {"Authorization": "Bearer " + tokenInput.value} : {};
  let body;
  try {
    const r = await fetch("predict?explain=true", {method: "POST", body: form, headers});
    body = await r.json();
    if (!r.ok) { error.textContent = `${r.status}: ${body.detail || "the request failed"}`; return; }
  } catch (e) { error.textContent = "could not reach the server: " + e; return; }
  const p = body.predictions[0];
  document.getElementById("label").textContent = p.label;
  const bars = document.getElementById("bars"); bars.textContent = "";
  for (const [name, prob] of Object.entries(p.probabilities).sort((a, b) => b[1] - a[1])) {
    const row = document.createElement("div"); row.className = "bar";
    const label = document.createElement("span"); label.className = "name"; label.textContent = name;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = (100 * prob).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span"); value.textContent = (100 * prob).toFixed(1) + " %";
    row.append(label, track, value); bars.appendChild(row);
  }
  const t = body.timings_ms;
  document.getElementById("timing").textContent = `${p.width} x ${p.height} ${p.format}; server time ${t.total.toFixed(0)} ms`;
  const original = document.getElementById("original");
  if (/^image\\/(png|jpeg|gif|webp|bmp)$/.test(file.type)) original.src = URL.createObjectURL(file);
  else original.removeAttribute("src");
  document.getElementById("heatmap").src = "data:image/png;base64," + p.heatmap_png;
  document.getElementById("heatcap").textContent = `where the model looked (${p.explanation})`;
  result.hidden = false;
}
</script>
</body>
</html>
"""
