"""Live previews: strips at sampling steps K, 2K, ... of every validation (atomic PNGs, TensorBoard,
the webhook, which a local HTTP server receives), and the linear latent-to-RGB decode against the
VAE's own decode of held-out latents."""
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.sample.preview import fit_latent_rgb, pool_to_latent_grid, psnr, vae_colours
from vidtune.testing import DEMO_CLIPS, make_test_video, tiny_run_toml, write_captioned_clips

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)


class Receiver(BaseHTTPRequestHandler):
    posts: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append((self.headers["Content-Type"], body))
        self.send_response(204)
        self.end_headers()


def test_previews_at_k_2k_sent_and_logged(tmp_path, tiny_wan_dir):
    Receiver.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        clips = write_captioned_clips(tmp_path / "clips")
        cfg = tmp_path / "p.toml"
        cfg.write_text(tiny_run_toml(tiny_wan_dir, tmp_path / "cache", {"clips": clips}, tmp_path / "run",
                                     "max_train_steps = 2\ncheckpoint_every = 0", f"""
[validation]
every = 2
prompts = ["a red cat"]
steps = 5
num_frames = 5
resolution = "32x32"
preview_every = 2
webhook_url = "http://127.0.0.1:{server.server_port}/hook"
"""))
        assert cli_main([str(cfg), "--set", "logging.report_to=tensorboard"]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    run = tmp_path / "run"
    for step in ("step_000000", "step_000002"):  # the baseline and step 2; 5 sampling steps: 2 and 4
        assert sorted(p.name for p in (run / "validation" / step / "previews").iterdir()) == \
            ["a_red_cat_step002.png", "a_red_cat_step004.png"]
    assert (run / "validation" / "latent_rgb.json").is_file()
    # Per validation: two previews, then the contact sheet; each a multipart PNG + JSON payload.
    assert len(Receiver.posts) == 6
    assert all(t.startswith("multipart/form-data") and b"\x89PNG" in b and b"payload_json" in b
               for t, b in Receiver.posts)
    assert b'"type": "preview"' in Receiver.posts[0][1] and b'"type": "validation"' in Receiver.posts[2][1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "logs"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in ev.Images("preview/a_red_cat/step_000002")] == [2, 4]


def test_linear_decode_beats_the_mean_colour_on_held_out_latents(tmp_path, tiny_wan_dir):
    from diffusers import AutoencoderKLWan

    from vidtune.data.video import load_video_clip

    vae = AutoencoderKLWan.from_pretrained(tiny_wan_dir, subfolder="vae").eval()
    zd = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, zd, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, zd, 1, 1, 1)
    latents = []
    for i, (pattern, _) in enumerate(DEMO_CLIPS):
        path = make_test_video(tmp_path / f"c{i}.mp4", 32, 32, frames=9, pattern=pattern)
        px = load_video_clip(path, 9, 16, 32, 32)[None]
        with torch.no_grad():
            z = vae.encode(px).latent_dist.mode()
        latents.append(((z - mean) / std)[0])  # normalised, as the latent cache holds them
    fit = fit_latent_rgb(vae, latents[:3])
    held = latents[3][None]
    truth = pool_to_latent_grid(vae_colours(vae, held), held.shape[2], 4, 8)  # (1, 3, F, h, w)
    ours = fit.rgb(held).movedim(-3, 1)
    flat = truth.mean(dim=(2, 3, 4), keepdim=True).expand_as(truth)
    p_fit, p_mean = psnr(ours, truth), psnr(flat, truth)
    print(f"latent-to-RGB PSNR on a held-out clip: fit {p_fit:.2f} dB, mean colour {p_mean:.2f} dB")
    assert p_fit > p_mean
