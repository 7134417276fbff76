"""The page at `/`: drop or pick an image, see the label, a bar per class and the version that answered.
A Python string (not a data file) so that every install of the package carries it."""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>skinreg serve</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef; }
  .row { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
  .name { width: 12rem; } .bar { height: 1rem; background: #47a; } .pct { width: 4rem; text-align: right; }
  #error { color: #b00; } img { max-width: 12rem; margin-top: 1rem; }
</style>
</head>
<body>
<h1>skinreg serve</h1>
<p>Model <code id="served">__MODEL__</code>. Drop an image (JPEG, PNG or WebP) or pick one.</p>
<div id="drop">drop an image here, or click to pick one<input id="file" type="file" accept="image/*" hidden></div>
<p><label>Bearer token (if the server needs one) <input id="token" type="password" autocomplete="off"></label></p>
<div id="result" hidden>
  <h2 id="label"></h2>
  <p>answered by <code id="version"></code></p>
  <div id="bars"></div>
</div>
<p id="error"></p>
<img id="preview" alt="" hidden>
<script>
const LABELS = __LABELS__;
const drop = document.getElementById("drop"), file = document.getElementById("file");
drop.onclick = () => file.click();
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); };
file.onchange = () => { if (file.files[0]) send(file.files[0]); };

function softmax(z) { const m = Math.max(...z), e = z.map((v) => Math.exp(v - m)), s = e.reduce((a, b) => a + b, 0); return e.map((v) => v / s); }

async function send(f) {
  const error = document.getElementById("error"), result = document.getElementById("result");
  error.textContent = ""; result.hidden = true;
  const preview = document.getElementById("preview"); preview.src = URL.createObjectURL(f); preview.hidden = false;
  const headers = { "Content-Type": f.type || "application/octet-stream" };
  const token = document.getElementById("token").value; if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const r = await fetch("predict", { method: "POST", body: f, headers });
    const body = await r.json();
    if (!r.ok) { error.textContent = body.error || ("HTTP " + r.status); return; }
    document.getElementById("label").textContent = body.label + " (" + (100 * body.confidence).toFixed(1) + " %)";
    document.getElementById("version").textContent = body.model.name + " version " + body.model.version;
    const bars = document.getElementById("bars"); bars.textContent = "";
    softmax(body.logits).forEach((p, k) => {
      const row = document.createElement("div"); row.className = "row"; row.dataset.classId = k;
      const name = document.createElement("span"); name.className = "name"; name.textContent = LABELS[k] || String(k);
      const bar = document.createElement("span"); bar.className = "bar"; bar.style.width = (15 * p) + "rem";
      const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = (100 * p).toFixed(1) + " %";
      row.append(name, bar, pct); bars.append(row);
    });
    result.hidden = false;
  } catch (e) { error.textContent = String(e); }
}
</script>
</body>
</html>
"""
