"""Hub push ([hub]) end to end against a local HTTP server speaking the endpoints huggingface_hub
calls for a repo creation and a commit (HF_ENDPOINT points at it): the files it receives are the
run's LoRA, its config and a model card; an unreachable hub never fails the run."""
import base64
import gzip
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vidtune.cli.train import main as cli_main
from vidtune.testing import tiny_run_toml, write_captioned_clips

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)


class FakeHub(BaseHTTPRequestHandler):
    created: list = []
    commits: list = []  # [(repo, {path: bytes}, header)]
    seen: list = []

    def log_message(self, *args):
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

    def do_POST(self):
        body, parts = self._body(), self.path.split("?")[0].strip("/").split("/")
        self.seen.append(("POST", self.path))
        if parts[:3] == ["api", "repos", "create"]:
            req = json.loads(body)
            self.created.append(req)
            repo = f"{req.get('organization') or 'me'}/{req['name']}"
            return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
        if parts == ["api", "validate-yaml"]:  # the model card's metadata
            return self._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files], "commitOid": "0" * 40})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            header = next(x["value"] for x in lines if x["key"] == "header")
            self.commits.append((f"{parts[2]}/{parts[3]}", files, header))
            url = f"http://{self.headers['Host']}/{parts[2]}/{parts[3]}/commit/{'a' * 40}"
            return self._json({"commitUrl": url, "commitOid": "a" * 40, "success": True})
        self._json({"error": f"unexpected POST {self.path}"}, 404)

    def do_GET(self):
        self.seen.append(("GET", self.path))
        self._json({"error": f"unexpected GET {self.path}"}, 404)


@pytest.fixture
def hub(monkeypatch):
    FakeHub.created, FakeHub.commits, FakeHub.seen = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield FakeHub
    server.shutdown()
    server.server_close()
    thread.join(5)


def hub_config(tmp_path, model, train: str, hub: str = ""):
    clips = write_captioned_clips(tmp_path / "clips")
    cfg = tmp_path / "hub.toml"
    cfg.write_text(tiny_run_toml(model, tmp_path / "cache", {"clips": clips}, tmp_path / "run", train,
                                 f'[hub]\nrepo_id = "me/tiny-lora"\n{hub}\n'))
    return cfg


def test_push_sends_the_lora_config_and_card(tmp_path, tiny_wan_dir, hub, capsys):
    cfg = hub_config(tmp_path, tiny_wan_dir, "max_train_steps = 2\ncheckpoint_every = 1",
                     "push_every_checkpoint = true")
    assert cli_main([str(cfg)]) == 0, hub.seen
    assert [(c["name"], c["visibility"]) for c in hub.created] == [("tiny-lora", "private")] * 3
    assert [c[0] for c in hub.commits] == ["me/tiny-lora"] * 3
    ckpt, _, final = hub.commits
    assert set(ckpt[1]) == {"checkpoints/step-1/wan_lora.safetensors",
                            "checkpoints/step-1/vidtune_config.toml"}
    files = final[1]
    # the default export: one file in the original Wan layout, for ComfyUI and diffusers alike
    assert set(files) == {"wan_lora.safetensors", "vidtune_config.toml", "README.md"}
    run = tmp_path / "run"
    assert files["wan_lora.safetensors"] == (run / "wan_lora.safetensors").read_bytes()
    assert files["vidtune_config.toml"] == (tmp_path / "run" / "config.resolved.toml").read_bytes()
    card = files["README.md"].decode()
    assert "trained with vidtune for 2 steps" in card and 'weight_name="wan_lora.safetensors"' in card
    assert "WanPipeline.from_pretrained" in card and "ComfyUI: put `wan_lora.safetensors`" in card
    assert "hub: pushed 3 file(s) to me/tiny-lora" in capsys.readouterr().out


def test_unreachable_hub_never_fails_the_run(tmp_path, tiny_wan_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    cfg = hub_config(tmp_path, tiny_wan_dir, "max_train_steps = 1")
    assert cli_main([str(cfg)]) == 0
    assert (tmp_path / "run" / "wan_lora.safetensors").is_file()
    assert "warning: hub push to me/tiny-lora failed" in capsys.readouterr().out
