"""Tiny random Wan and Sana Video checkpoints and test videos, built offline (tests and the CPU
demo reuse them).

Nothing here downloads anything: the models are random and tiny, the tokenizer is a Unigram
model built from a fixed vocabulary, and videos come from ffmpeg's ``testsrc`` generator.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

# UMT5's convention: pad = 0, eos = 1, unk = 2 (the Wan tokenizer is a T5 tokenizer).
_SPECIAL = ["<pad>", "</s>", "<unk>"]
_WORDS = ["▁a", "▁the", "▁cat", "▁dog", "▁video", "▁of", "▁in", "▁on", "▁and", "▁red", "▁blue"]
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-")


def _unigram_tokenizer(special: list[str], unk: str, single: str, pair: str, added: str, **kw):
    """A fast Unigram + Metaspace tokenizer over the fixed test vocabulary; ``added`` is the special
    token the template inserts (T5's ``</s>`` after, Gemma's ``<bos>`` before)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(t, 0.0) for t in special] + [("▁", -2.0)]
    vocab += [(w, -1.0) for w in _WORDS] + [(c, -3.0) for c in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=special.index(unk)))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(added, special.index(added))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **kw)


def build_tiny_tokenizer():
    """A T5-style fast tokenizer (Unigram + Metaspace, ``</s>`` appended) with ~90 tokens."""
    return _unigram_tokenizer(_SPECIAL, "<unk>", "$A </s>", "$A </s> $B </s>", "</s>", pad_token="<pad>",
                              eos_token="</s>", model_max_length=512)


def build_tiny_wav2vec2(seed: int = 0, hidden: int = 12, layers: int = 24):
    """A random ``Wav2Vec2ForCTC`` in the XLS-R layout (stable layer norm, layer-norm feature
    extractor; ``layers`` + 1 hidden states of size ``hidden``: 25 like XLS-R, what Wan S2V's layer
    average takes) and its feature extractor."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(vocab_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer",
                         architectures=["Wav2Vec2ForCTC"])
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    return Wav2Vec2ForCTC(cfg).eval(), fe


def tiny_vae_config() -> dict:
    return dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])


def tiny_transformer_config(text_dim: int = 32) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=16, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32)


def build_tiny_wan_pipeline(seed: int = 0, d_model: int = 32, transformer: dict | None = None):
    """A random ``WanPipeline`` with every component tiny (fp32, CPU); ``transformer`` overrides
    entries of ``tiny_transformer_config``."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )).eval()
    vae = AutoencoderKLWan(**tiny_vae_config()).eval()
    transformer = WanTransformer3DModel(**{**tiny_transformer_config(text_dim=d_model), **(transformer or {})}).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler, transformer=transformer)


def build_tiny_wan_pipeline_dir(path: str | Path, seed: int = 0, d_model: int = 32,
                                transformer: dict | None = None) -> Path:
    """Save a tiny random Wan pipeline in the diffusers layout (model_index.json, transformer/,
    vae/, text_encoder/, tokenizer/, scheduler/) under ``path`` and return it."""
    path = Path(path)
    build_tiny_wan_pipeline(seed=seed, d_model=d_model, transformer=transformer).save_pretrained(path)
    return path


# Tiny stand-ins of the Wan 2.1 / 2.2 pipelines beside text-to-video (build_tiny_wan_variant).
WAN_VARIANTS = ("i2v-2.1", "i2v-2.2", "t2v-a14b", "ti2v")
TINY_BOUNDARY = {"i2v-2.2": 0.9, "t2v-a14b": 0.875}


def tiny_wan22_vae_config(z_dim: int = 48) -> dict:
    """The Wan 2.2 VAE's layout (residual blocks, 2x2 patchify: 16x spatial, 4x temporal) at tiny width."""
    g = torch.Generator().manual_seed(z_dim)
    return dict(base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                latents_mean=(torch.randn(z_dim, generator=g) * 0.5).tolist(),
                latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist())


def build_tiny_wan_variant(kind: str, seed: int = 0, d_model: int = 32, transformer: dict | None = None,
                           boundary_ratio: float | None = None):
    """A random diffusers pipeline of one Wan variant, every component tiny (fp32, CPU):

    - ``i2v-2.1``: WanImageToVideoPipeline, 36-channel transformer with CLIP image cross-attention
      and a tiny CLIPVisionModel image encoder + CLIPImageProcessor;
    - ``i2v-2.2``: WanImageToVideoPipeline, two 36-channel experts, no image encoder;
    - ``t2v-a14b``: WanPipeline with two experts (``transformer_2``) and ``boundary_ratio``;
    - ``ti2v``: WanPipeline with ``expand_timesteps`` and the Wan 2.2 VAE layout (48 channels, 16x).

    ``boundary_ratio`` defaults to the published one of two-expert kinds (0 = leave it out)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    if kind not in WAN_VARIANTS:
        raise ValueError(f"kind must be one of {WAN_VARIANTS}, got {kind!r}")
    tcfg = dict(transformer or {})
    if kind.startswith("i2v"):
        tcfg.setdefault("in_channels", 36)
    if kind == "i2v-2.1":
        tcfg.update(image_dim=16, added_kv_proj_dim=16)
    if kind == "ti2v":
        tcfg.update(in_channels=48, out_channels=48)
    base = build_tiny_wan_pipeline(seed=seed, d_model=d_model, transformer=tcfg)
    parts = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                 transformer=base.transformer)
    if kind in TINY_BOUNDARY:
        torch.manual_seed(seed + 1)
        parts["transformer_2"] = WanTransformer3DModel(
            **{**tiny_transformer_config(text_dim=d_model), **tcfg}).eval()
        ratio = TINY_BOUNDARY[kind] if boundary_ratio is None else boundary_ratio
        if ratio:
            parts["boundary_ratio"] = ratio
    if kind == "ti2v":
        torch.manual_seed(seed + 2)
        parts["vae"] = AutoencoderKLWan(**tiny_wan22_vae_config()).eval()
        return WanPipeline(**parts, expand_timesteps=True)
    if kind == "t2v-a14b":
        return WanPipeline(**parts)
    if kind == "i2v-2.1":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed + 3)
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=16, projection_dim=16)).eval()
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(**parts)


def build_tiny_wan_variant_dir(path: str | Path, kind: str, **kw) -> Path:
    """``build_tiny_wan_variant`` saved in the diffusers layout under ``path``."""
    path = Path(path)
    build_tiny_wan_variant(kind, **kw).save_pretrained(path)
    return path


def build_tiny_wan_s2v_pipeline_dir(path: str | Path, seed: int = 0, d_model: int = 32) -> Path:
    """A tiny random Wan S2V pipeline in the diffusers-port layout: the tiny Wan components, a
    ``transformer/`` holding ``tiny_wan_s2v_transformer`` (text_dim = the text encoder's width,
    audio_dim = the audio encoder's), ``audio_encoder/`` (a tiny Wav2Vec2ForCTC) and ``audio_processor/``."""
    from vidtune.models import save_pretrained

    path = build_tiny_wan_pipeline_dir(path, seed=seed, d_model=d_model)
    audio, fe = build_tiny_wav2vec2(seed)
    audio.save_pretrained(path / "audio_encoder")
    fe.save_pretrained(path / "audio_processor")
    shutil.rmtree(path / "transformer")
    save_pretrained(tiny_wan_s2v_transformer(seed, text_dim=d_model, audio_dim=audio.config.hidden_size),
                    path / "transformer")
    return path


def tiny_wan_transformer(seed: int = 0, **config):
    """A small vidtune Wan transformer (4 blocks, 2 heads x 16) with every parameter drawn from
    N(0, 0.2), so no term is trivially zero; ``config`` overrides WanConfig fields."""
    from vidtune.models.wan import WanConfig, WanTransformer

    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=24, freq_dim=16, ffn_dim=40, num_layers=4, rope_max_seq_len=64)
    torch.manual_seed(seed)
    model = WanTransformer(WanConfig(**{**base, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.train()


def tiny_wan_inputs(b: int = 2, f: int = 3, h: int = 4, w: int = 6, seed: int = 1, text_len: int = 5):
    """(latents, timesteps, text embeddings) for ``tiny_wan_transformer``: 3 x 2 x 3 = 18 tokens."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, f, h, w, generator=g), torch.tensor([900.0, 40.0])[:b],
            torch.randn(b, text_len, 24, generator=g))


# Gemma's convention: pad = 0, eos = 1, bos = 2, unk = 3; <bos> starts every encoding.
_GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build_tiny_gemma_tokenizer():
    """A Gemma-style fast tokenizer (Unigram + Metaspace, ``<bos>`` prepended) with ~90 tokens."""
    return _unigram_tokenizer(_GEMMA_SPECIAL, "<unk>", "<bos> $A", "<bos> $A $B", "<bos>", pad_token="<pad>",
                              eos_token="<eos>", bos_token="<bos>", model_max_length=4096)


def tiny_sana_transformer_config(caption_channels: int = 32) -> dict:
    return dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                caption_channels=caption_channels, mlp_ratio=2.0, sample_size=30, patch_size=(1, 2, 2),
                rope_max_seq_len=32)


def build_tiny_sana_pipeline(seed: int = 0, d_model: int = 32, transformer: dict | None = None):
    """A random ``SanaVideoPipeline`` with every component tiny (fp32, CPU): Gemma2 text encoder,
    Wan VAE, Sana Video transformer, and the published checkpoint's scheduler (flow DPM-Solver,
    shift 8); ``transformer`` overrides entries of ``tiny_sana_transformer_config``."""
    from diffusers import (AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline,
                           SanaVideoTransformer3DModel)
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tokenizer = build_tiny_gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )).eval()
    vae = AutoencoderKLWan(**tiny_vae_config()).eval()
    transformer = SanaVideoTransformer3DModel(
        **{**tiny_sana_transformer_config(caption_channels=d_model), **(transformer or {})}).eval()
    scheduler = DPMSolverMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)


def build_tiny_sana_pipeline_dir(path: str | Path, seed: int = 0, d_model: int = 32,
                                 transformer: dict | None = None) -> Path:
    """Save a tiny random Sana Video pipeline in the diffusers layout under ``path``."""
    path = Path(path)
    build_tiny_sana_pipeline(seed=seed, d_model=d_model, transformer=transformer).save_pretrained(path)
    return path


def tiny_sana_transformer(seed: int = 0, **config):
    """A small vidtune Sana Video transformer (3 blocks, 2 heads x 8) with every parameter drawn
    from N(0, 0.2), so no term is trivially zero; ``config`` overrides SanaVideoConfig fields."""
    from vidtune.models.sana_video import SanaVideoConfig, SanaVideoTransformer

    base = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
                mlp_ratio=2.0, rope_max_seq_len=32)
    torch.manual_seed(seed)
    model = SanaVideoTransformer(SanaVideoConfig(**{**base, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.train()


def tiny_s2v_config(**config) -> dict:
    """A small Wan S2V config (3 blocks, 2 heads x 16, audio injected after blocks 0 and 2)."""
    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                out_channels=16, text_dim=24, freq_dim=16, ffn_dim=40, num_layers=3, rope_max_seq_len=64,
                audio_dim=12, audio_inject_layers=(0, 2), pose_dim=16)
    return {**base, **config}


def tiny_wan_s2v_transformer(seed: int = 0, **config):
    """A small vidtune Wan S2V transformer with every parameter drawn from N(0, 0.2)."""
    from vidtune.models.wan_s2v import WanS2VConfig, WanS2VTransformer

    torch.manual_seed(seed)
    model = WanS2VTransformer(WanS2VConfig(**tiny_s2v_config(**config)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.train()


def tiny_wan_s2v_inputs(b: int = 2, f: int = 3, h: int = 8, w: int = 8, seed: int = 1, audio_dim: int = 12,
                        text_len: int = 5, motion: int | None = 19) -> tuple[tuple, dict]:
    """(args, kwargs) for ``tiny_wan_s2v_transformer``: f x 4 x 4 video tokens + 16 reference
    tokens (+ 16 + 4 + 4 motion tokens with ``motion`` latents)."""
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(b, 16, f, h, w, generator=g), torch.tensor([900.0, 40.0, 500.0, 3.0])[:b],
            torch.randn(b, text_len, 24, generator=g))
    kwargs = dict(audio=torch.randn(b, 25, audio_dim, 4 * f, generator=g),
                  ref_latents=torch.randn(b, 16, 1, h, w, generator=g),
                  motion_latents=None if motion is None else torch.randn(b, 16, motion, h, w, generator=g))
    return args, kwargs


def make_test_video(path: str | Path, width: int = 32, height: int = 32, frames: int = 9,
                    fps: int = 16, pattern: str = "testsrc") -> Path:
    """Encode ``frames`` frames of an ffmpeg test pattern (h264 for .mp4/.mkv/.mov, vp8 for .webm)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is missing: sudo apt-get install -y ffmpeg")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = ["-c:v", "libvpx", "-b:v", "200k"] if path.suffix == ".webm" else ["-pix_fmt", "yuv420p"]
    subprocess.run(
        [ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"{pattern}=size={width}x{height}:rate={fps}", "-frames:v", str(frames), *codec,
         str(path)],
        check=True,
    )
    return path


def make_test_clip_with_audio(path: str | Path, width: int = 32, height: int = 32, frames: int = 9,
                              fps: int = 16, pattern: str = "testsrc", tones: tuple[float, ...] = (440.0,),
                              audio_seconds: float | None = None, sample_rate: int = 44100) -> Path:
    """A video with an AAC soundtrack of sine tones, one channel per tone (two tones: stereo);
    ``audio_seconds`` shorter than the video leaves the rest silent (no samples)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is missing: sudo apt-get install -y ffmpeg")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds = audio_seconds if audio_seconds is not None else frames / fps
    inputs = ["-f", "lavfi", "-t", f"{frames / fps}", "-i", f"{pattern}=size={width}x{height}:rate={fps}"]
    for f in tones:
        inputs += ["-f", "lavfi", "-t", f"{seconds}", "-i", f"sine=frequency={f}:sample_rate={sample_rate}"]
    if len(tones) > 1:
        pads = "".join(f"[{i + 1}:a]" for i in range(len(tones)))
        mix = ["-filter_complex", f"{pads}amerge=inputs={len(tones)}[a]", "-map", "0:v", "-map", "[a]"]
    else:
        mix = ["-map", "0:v", "-map", "1:a"]
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", *inputs, *mix, "-pix_fmt", "yuv420p", "-c:a", "aac",
                    str(path)], check=True)
    return path


def write_captioned_clips(root: str | Path) -> Path:
    """Two 32x32, 9-frame ffmpeg clips with captions (tests add their own bad files beside them)."""
    root = Path(root)
    for i, pattern in enumerate(["testsrc", "testsrc2"]):
        make_test_video(root / f"clip{i}.mp4", 32, 32, frames=9, pattern=pattern)
        (root / f"clip{i}.txt").write_text(["a red cat", "the blue dog"][i])
    return root


def tiny_run_toml(model: str | Path, cache: str | Path, datasets: dict[str, str | Path], out: str | Path,
                  train: str = "", extra: str = "", *, model_lines: str = "", adapter: str = "",
                  dataset_lines: str = "", resolution: int = 32) -> str:
    """A CPU fp32 run config (LoRA rank 4, batch 1, ``resolution``-pixel 9-frame datasets
    ``{id: path}``, no metrics backend) for the tiny model at ``model`` writing to ``out``.
    More lines: ``train`` for [train], ``model_lines`` for [model], ``adapter`` for [adapter],
    ``dataset_lines`` for each [[dataset]]; ``extra``: more TOML tables."""
    tables = "".join(f'\n[[dataset]]\nid = "{i}"\npath = "{p}"\nresolution = {resolution}\nnum_frames = 9\n'
                     f'{dataset_lines}\n' for i, p in datasets.items())
    return f"""
[model]
path = "{model}"
dtype = "fp32"
vae_dtype = "fp32"
text_encoder_dtype = "fp32"
{model_lines}
[adapter]
rank = 4
{adapter}
[train]
output_dir = "{out}"
device = "cpu"
batch_size = 1
mixed_precision = "no"
{train}
[cache]
dir = "{cache}"

[logging]
report_to = "none"
progress_bar = false
{extra}
{tables}"""


def make_test_image(path: str | Path, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)
    return path


# The training demo (scripts/demo.sh, examples/quickstart.toml): a small random Wan and a few
# captioned ffmpeg clips to overfit, so the loss visibly falls within a few CPU minutes.
DEMO_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=256, num_layers=4)
DEMO_CLIPS = [("testsrc", "a red cat"), ("testsrc2", "a blue dog"), ("smptebars", "the video of a cat"),
              ("rgbtestsrc", "a dog on the red video")]


def demo_setup(root: str | Path) -> Path:
    """``root/model`` (diffusers-layout pipeline) and ``root/videos`` (clips + captions)."""
    root = Path(root)
    if not (root / "model" / "model_index.json").is_file():
        build_tiny_wan_pipeline_dir(root / "model", transformer=DEMO_TRANSFORMER)
    for i, (pattern, caption) in enumerate(DEMO_CLIPS):
        make_test_video(root / "videos" / f"clip{i}.mp4", 64, 64, frames=9, pattern=pattern)
        (root / "videos" / f"clip{i}.txt").write_text(caption)
    print(f"demo model: {root / 'model'}; {len(DEMO_CLIPS)} clips in {root / 'videos'}")
    return root


def demo_check(run_dir: str | Path) -> bool:
    """Print and check the demo's learning criterion (last-10 mean loss < half the first-10 mean)
    and that both loaders take its LoRA (``check_loaders``)."""
    from .train.log import loss_values

    losses = loss_values(run_dir)
    if len(losses) < 20:
        print(f"learning check: only {len(losses)} steps logged in {run_dir}; need 20")
        return False
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    ok = last < first / 2
    print(f"learning check: mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f} "
          f"(ratio {last / first:.2f}, need < 0.50): {'PASS' if ok else 'FAIL'}")
    return check_loaders(run_dir) and ok


def comfyui_merged(model, tensors: dict):
    """``model`` (a vidtune Wan or Wan S2V) with an original-layout adapter folded in by ComfyUI's rules."""
    from .adapters.names import original_name

    family = getattr(model, "family", "wan")
    with torch.no_grad():
        for name, m in model.named_modules():
            orig = isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and original_name(name, family)
            for prefix in ((f"diffusion_model.{orig}", f"lora_unet_{orig.replace('.', '_')}") if orig else ()):
                if any(k.startswith(prefix + ".") for k in tensors):
                    m.weight += comfyui_delta(tensors, prefix, m.weight.shape).to(m.weight.dtype)
    return model


def check_loaders(run_dir: str | Path, tol: float = 1e-4) -> bool:
    """The run's original-layout LoRA in both loaders: every key is one ComfyUI maps onto the
    model, and diffusers' ``load_lora_weights`` (on that file, or on the diffusers file written
    beside it when diffusers cannot read it) gives the transformer ComfyUI's rules make."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from .adapters.lora import DIFFUSERS_FILE, WAN_FILE
    from .config import load_config
    from .models import from_pretrained

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.resolved.toml")
    model_dir = cfg.model.resolved_path()
    wan = load_file(run_dir / WAN_FILE)
    model = from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    stray = sorted(set(wan) - comfyui_lora_keys(original_weight_keys(model)))
    for_diffusers = run_dir / DIFFUSERS_FILE if (run_dir / DIFFUSERS_FILE).is_file() else run_dir / WAN_FILE
    pipe = WanPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.load_lora_weights(str(for_diffusers))
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c.in_channels, 3, 4, 4, generator=g)
    t, ctx = torch.tensor([700.0]), torch.randn(1, 512, c.text_dim, generator=g)
    with torch.no_grad():
        base = model(x, t, ctx)
        comfy = comfyui_merged(model, wan)(x, t, ctx)
        theirs = pipe.transformer(x, t, ctx, return_dict=False)[0]
    err = ((theirs - comfy).norm() / comfy.norm()).item()
    moved = ((comfy - base).norm() / comfy.norm()).item()
    ok = not stray and err <= tol and moved > 10 * tol
    print(f"loader check: {len(wan)} keys of {WAN_FILE}, {len(stray)} outside ComfyUI's key map{f' (e.g. {stray[0]})' if stray else ''}; "
          f"diffusers with {for_diffusers.name} vs ComfyUI's merge: relative difference {err:.1e} (need <= {tol:.0e}; "
          f"the LoRA moves the output by {moved:.1e}): {'PASS' if ok else 'FAIL'}")
    return ok


# ComfyUI's rule for Wan LoRA keys (comfy/lora.py, ``model_lora_keys_unet``): for every key
# ``diffusion_model.<path>.weight`` of the loaded model it maps the prefixes ``diffusion_model.<path>``
# and ``lora_unet_<path, dots as _>``; ``load_lora`` and comfy/weight_adapter/{lora,lokr}.py read these
# suffixes after a prefix (the LoRA and LoKr ones; LoHa, GLoRA and diff keys are left out).
COMFYUI_SUFFIXES = (".alpha", ".dora_scale", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
                    ".lora_B.weight", ".lora_A.weight", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b",
                    ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")


def original_weight_keys(model) -> set[str]:
    """``diffusion_model.<original path>.weight`` of every Linear and Conv3d of a vidtune Wan model
    (without adapters):
    the keys ComfyUI's Wan model has for them. Each name is checked against diffusers' own
    converter of original checkpoints (``convert_wan_transformer_to_diffusers``): it must map the
    original key back to the module's diffusers key. Raises if a module has no original name."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from .adapters.names import original_name

    keys = set()
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        orig = original_name(name)
        if orig is None:
            raise AssertionError(f"{name}: a trainable module without an original Wan name")
        back = convert_wan_transformer_to_diffusers({f"{orig}.weight": torch.zeros(1)})
        if set(back) != {f"{name}.weight"}:
            raise AssertionError(f"{name} -> {orig}: diffusers converts it back to {sorted(back)}")
        keys.add(f"diffusion_model.{orig}.weight")
    return keys


def comfyui_lora_keys(weight_keys) -> set[str]:
    """Every adapter key ComfyUI loads for a model with these ``diffusion_model.*.weight`` keys."""
    out = set()
    for k in weight_keys:
        path = k[len("diffusion_model."):-len(".weight")]
        for prefix in (f"diffusion_model.{path}", f"lora_unet_{path.replace('.', '_')}"):
            out.update(prefix + s for s in COMFYUI_SUFFIXES)
    return out


def comfyui_delta(tensors: dict, prefix: str, shape) -> torch.Tensor:
    """The weight delta ComfyUI applies for the adapter keys under ``prefix`` at strength 1
    (comfy/weight_adapter/lora.py: up @ down x alpha / rank; lokr.py: kron(w1, w2) x alpha / dim,
    dim the rank of the factored part, scale 1 without alpha or without a factored part)."""
    t = {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


if __name__ == "__main__":
    import sys

    usage = "usage: python -m vidtune.testing demo-setup DIR | demo-check RUN_DIR"
    if len(sys.argv) != 3 or sys.argv[1] not in ("demo-setup", "demo-check"):
        sys.exit(usage)
    if sys.argv[1] == "demo-setup":
        demo_setup(sys.argv[2])
    else:
        sys.exit(0 if demo_check(sys.argv[2]) else 1)


def torchrun_exe() -> str:
    """The torchrun of this Python's environment."""
    import os
    import sys

    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def run_torchrun(script_and_args: list[str], nproc: int, timeout: float, cwd=None, env=None):
    """Run ``torchrun --standalone --nproc_per_node=nproc ...``; returns (returncode, stdout, stderr).
    The launch is its own process group, killed whole if it outlives ``timeout`` (a hung rank
    never outlives a test)."""
    import os
    import signal

    proc = subprocess.Popen([torchrun_exe(), "--standalone", f"--nproc_per_node={nproc}", *script_and_args], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:g} s)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err
