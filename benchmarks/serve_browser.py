"""The page of `compress serve`, in a real headless browser: pick an image, drop one, read the top-5.

Starts `compress serve BUNDLE` on 127.0.0.1, opens / in Debian's Chromium driven by Playwright,
and checks that
  * the page loads nothing from anywhere but the server, and logs no error;
  * picking an image in the file input shows the top-5 (or all classes, if fewer) with the same
    labels and scores, to the shown precision, that POST /predict gives for that image, and the latency;
  * dropping an image on the drop zone does the same;
then saves a screenshot (benchmarks/results/serve_page.png by default).

Needs Chromium (`apt-get install chromium`) and Playwright's Python package without its own
browsers (`pip install -c constraints.txt playwright`, no `playwright install`). Without
either it prints `skip: ...` and exits 0.

    python benchmarks/serve_browser.py dist/mnv2-int8          # a bundle (Fashion-MNIST: a test image)
    python benchmarks/serve_browser.py --tiny                  # a tiny synthetic run's bundle, ~1 min
    python benchmarks/serve_browser.py BUNDLE --image shoe.png --screenshot /tmp/page.png
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from serve import Server, payload, tiny_bundles  # noqa: E402  (benchmarks/serve.py)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def skip(reason: str) -> None:
    print(f"skip: {reason}")
    sys.exit(0)


def test_image(health: dict, image: Path | None) -> tuple[str, bytes]:
    """(file name, PNG bytes): --image, else a Fashion-MNIST test image when the model is one, else noise."""
    if image is not None:
        return image.name, image.read_bytes()
    if health["labels"][:2] == ["T-shirt/top", "Trouser"]:
        try:
            from PIL import Image

            from compress.config import DataConfig
            from compress.data import LOADERS

            raw = LOADERS["fashion-mnist"](DataConfig(dataset="fashion-mnist"), lambda m: None)
            buf = io.BytesIO()
            Image.fromarray(raw.test_x[0][0]).save(buf, format="PNG")   # test image 0: an ankle boot
            return "fashion-mnist-test-0.png", buf.getvalue()
        except Exception as exc:  # noqa: BLE001 (no dataset here: any image will do)
            print(f"note: no Fashion-MNIST test image ({exc}); using noise", file=sys.stderr)
    return "noise.png", payload(health)


def shown(page) -> list[tuple[str, str]]:
    rows = page.eval_on_selector_all("#results li", "els => els.map(e => [e.children[1].textContent, "
                                                     "e.children[2].textContent])")
    return [tuple(row) for row in rows]


def check(server: Server, image: tuple[str, bytes], screenshot: Path, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{server.port}"
    name, data = image
    status, body = server.request("POST", "/predict?top_k=5", data)
    assert status == 200, body
    want = [(t["label"], f"{100 * t['score']:.2f}%") for t in json.loads(body)["predictions"][0]["top"]]
    elsewhere, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 430}, device_scale_factor=1)
            page.on("request", lambda r: None if r.url.startswith((base, "blob:", "data:")) else elsewhere.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('sha256')", timeout=10_000)
            # 1. the file picker
            page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
            page.wait_for_selector(f"#results li:nth-child({len(want)})", timeout=10_000)
            page.wait_for_function("document.getElementById('latency').textContent.includes('server')")
            picked, latency = shown(page), page.text_content("#latency")
            # 2. a drop on the drop zone (a DataTransfer made in the page, as a drag from the desktop makes one)
            page.evaluate("document.getElementById('results').replaceChildren()")
            page.evaluate("""([name, b64]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                                                    cancelable: true}));
            }""", [name, base64.b64encode(data).decode()])
            page.wait_for_selector(f"#results li:nth-child({len(want)})", timeout=10_000)
            dropped = shown(page)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            model = page.text_content("#model")
        finally:
            browser.close()
    assert picked == want, f"file picker: the page shows {picked}, /predict says {want}"
    assert dropped == want, f"drop: the page shows {dropped}, /predict says {want}"
    assert "server" in latency and "ms" in latency, latency
    assert not elsewhere, f"the page requested other origins: {elsewhere}"
    assert not errors, f"the page logged errors: {errors}"
    return {"top": picked, "latency": latency, "model": model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="a bundle directory (compress deploy --target onnx)")
    ap.add_argument("--tiny", action="store_true", help="build a tiny synthetic run's bundle instead")
    ap.add_argument("--image", type=Path, help="the image to classify (default: see the module docstring)")
    ap.add_argument("--screenshot", type=Path, default=HERE / "results" / "serve_page.png")
    args = ap.parse_args()
    if (args.bundle is None) == (not args.tiny):
        ap.error("pass a BUNDLE directory or --tiny")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is None:
        skip("no Chromium on this machine (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip("Playwright is not installed (pip install -c constraints.txt playwright)")

    with tempfile.TemporaryDirectory(prefix="serve-browser-") as tmp:
        bundle = tiny_bundles(Path(tmp))["fp32"] if args.tiny else args.bundle
        server = Server(bundle, workers=1)
        try:
            result = check(server, test_image(server.health, args.image), args.screenshot, chromium)
        except AssertionError as exc:
            print(f"FAIL: {exc}", file=sys.stderr)
            sys.exit(1)
        finally:
            server.stop()
    print(f"ok: {result['model']}")
    print(f"    top: {', '.join(f'{label} {score}' for label, score in result['top'])}")
    print(f"    {result['latency']}")
    print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
