"""The single page ``imgfeat serve`` shows at ``/``: pick or drop an image, see the label, bars, and the heat map.

Plain HTML and JavaScript (no external assets: it works on machines without internet access). Labels come from
the JSON of ``/predict`` (UTF-8), not from ``/explain``'s percent-encoded headers; a /health status other than
"ok" is shown as an error. A multi-label model gets one bar per finding with its threshold marked and the called
findings highlighted; several files picked (or dropped) at once are scored together, and "score as one study"
(checked by default) adds the study's result: their probabilities combined as the model was trained to.
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
  .bar div.track { position: relative; }
  .bar div.mark { position: absolute; top: 0; width: 2px; height: 100%; background: #1d2330; }
  .bar.positive span.name { font-weight: 700; color: #b00020; }
  .bar.positive div.fill { background: #d8483b; }
  #study-result, #images { margin: 0.8rem 0; }
  #images li { margin: 0.2rem 0; }
  #error { color: #b00020; font-weight: 600; }
  #token-row { display: none; margin: 0.5rem 0; }
</style>
</head>
<body>
<h1>imgfeat: try the model</h1>
<div class="muted" id="model">loading model information...</div>
<div id="token-row">Token: <input id="token" type="password" size="30" autocomplete="off"></div>
<div id="drop" tabindex="0">Drop a chest X-ray here (PNG, JPEG, DICOM), or click to pick a file
  <input id="file" type="file" accept="image/*,.dcm,.dicom,application/dicom" multiple hidden></div>
<div id="study-row" hidden><label><input id="as-study" type="checkbox" checked> score as one study</label>
  <span class="muted" id="picked"></span></div>
<div id="error" role="alert"></div>
<div id="result" hidden>
  <div id="study-result" hidden><h2 id="study-title"></h2><div id="study-label"></div><div id="study-bars"></div></div>
  <ol id="images" hidden></ol>
  <div id="label"></div>
  <div id="bars"></div>
  <div class="muted" id="timing"></div>
  <div class="row" id="figures">
    <figure><img id="original" alt="the uploaded image"><figcaption>uploaded image</figcaption></figure>
    <figure><img id="heatmap" alt="where the model looked"><figcaption id="heatcap">where the model looked</figcaption></figure>
  </div>
</div>
<p class="muted">The heat map shows which regions raised the score of the predicted class (multi-label: of the
most probable called finding; see docs/serving.md for how it is computed and its limits). A bar's dark mark is the
finding's threshold: at or above it the finding is called. Not a medical device: research use only.</p>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const tokenRow = document.getElementById("token-row"), tokenInput = document.getElementById("token");
const studyRow = document.getElementById("study-row"), asStudy = document.getElementById("as-study");
let picked = [];
fetch("health").then(r => r.json()).then(h => {
  const m = h.model;
  const what = m.task === "multi" ? `findings: ${m.findings.join(", ")}` : `classes: ${m.labels.join(", ")}`;
  document.getElementById("model").textContent =
    `${m.backbone} (${m.engine}, weights ${String(m.weights_id).slice(0, 28)}) + ${m.head}; ${what}`;
  if (h.auth) tokenRow.style.display = "block";
  if (h.status !== "ok") document.getElementById("error").textContent =
    `the server's model is not running (health: ${h.status}); restart imgfeat serve`;
});
drop.addEventListener("click", () => input.click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") input.click(); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files); });
input.addEventListener("change", () => pick(input.files));
asStudy.addEventListener("change", () => { if (picked.length > 1) send(picked); });

function pick(files) {
  picked = Array.from(files || []);
  if (!picked.length) return;
  studyRow.hidden = picked.length < 2;
  document.getElementById("picked").textContent = `${picked.length} files`;
  send(picked);
}

function pct(x) { return (100 * x).toFixed(1) + " %"; }

// One bar per class (sorted by probability) or, for a multi-label model, per finding (in the model's order,
// with the threshold marked and the called findings highlighted).
function drawBars(container, p) {
  container.textContent = "";
  const rows = p.findings ? p.findings.map(f => [f.name, f.probability, f.threshold, f.positive])
    : Object.entries(p.probabilities).sort((a, b) => b[1] - a[1]).map(([n, v]) => [n, v, null, false]);
  for (const [name, prob, threshold, positive] of rows) {
    const row = document.createElement("div"); row.className = positive ? "bar positive" : "bar";
    const label = document.createElement("span"); label.className = "name"; label.textContent = name;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = (100 * prob).toFixed(1) + "%";
    track.appendChild(fill);
    if (threshold !== null) {
      const mark = document.createElement("div"); mark.className = "mark"; mark.style.left = (100 * threshold).toFixed(1) + "%";
      mark.title = "threshold " + pct(threshold); track.appendChild(mark);
    }
    const value = document.createElement("span");
    value.textContent = pct(prob) + (threshold !== null ? ` (threshold ${pct(threshold)})` : "");
    row.append(label, track, value); container.appendChild(row);
  }
}

function labelText(p) {
  if (p.error_class) return `${p.error_class}: ${p.error_message}`;
  if (p.findings) return p.label ? p.label.split("|").join(", ") : "no finding called";
  return p.label;
}

async function send(files) {
  const error = document.getElementById("error"), result = document.getElementById("result");
  error.textContent = ""; result.hidden = true;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const study = files.length > 1 && asStudy.checked;
  if (study) form.append("study", "1");
  const headers = tokenInput.value ? {"Authorization": "Bearer " + tokenInput.value} : {};
  let body;
  try {
    const r = await fetch(files.length > 1 ? "predict" : "predict?explain=true", {method: "POST", body: form, headers});
    body = await r.json();
    if (!r.ok) { error.textContent = `${r.status}: ${body.detail || "the request failed"}`; return; }
  } catch (e) { error.textContent = "could not reach the server: " + e; return; }
  const studyBox = document.getElementById("study-result"), list = document.getElementById("images");
  studyBox.hidden = !body.study; list.hidden = files.length < 2; list.textContent = "";
  document.getElementById("study-bars").textContent = "";
  if (body.study) {
    const s = body.study;
    document.getElementById("study-title").textContent =
      `Study of ${s.images} images (${s.aggregation})` + (s.failed ? `, ${s.failed} could not be scored` : "");
    document.getElementById("study-label").textContent = labelText(s);
    if (s.probabilities) drawBars(document.getElementById("study-bars"), s);
  }
  if (files.length > 1) body.predictions.forEach(p => {
    const item = document.createElement("li");
    item.textContent = `${p.filename}: ${labelText(p)}`;
    list.appendChild(item);
  });
  const p = body.predictions.find(q => !q.error_class) || body.predictions[0];
  const first = files[body.predictions.indexOf(p)] || files[0];
  document.getElementById("label").textContent = (files.length > 1 ? p.filename + ": " : "") + labelText(p);
  document.getElementById("bars").textContent = "";
  if (p.probabilities) drawBars(document.getElementById("bars"), p);
  const t = body.timings_ms;
  document.getElementById("timing").textContent = `${p.width} x ${p.height} ${p.format}; server time ${t.total.toFixed(0)} ms`;
  const figures = document.getElementById("figures");
  figures.hidden = !p.heatmap_png;
  if (p.heatmap_png) {
    const original = document.getElementById("original");
    if (/^image\\/(png|jpeg|gif|webp|bmp)$/.test(first.type)) original.src = URL.createObjectURL(first);
    else original.removeAttribute("src");
    document.getElementById("heatmap").src = "data:image/png;base64," + p.heatmap_png;
    document.getElementById("heatcap").textContent =
      `where the model looked (${p.explanation}${p.explained ? ": " + p.explained : ""})`;
  }
  result.hidden = false;
}
</script>
</body>
</html>
"""
