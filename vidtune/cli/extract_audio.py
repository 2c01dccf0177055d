"""``vidtune extract-audio``: a 16 kHz mono WAV per video, for S2V audio datasets.

    vidtune extract-audio --input-dir datasets/s2v-videos --output-dir datasets/s2v-audio [--strip-audio]

Each video under --input-dir (searched recursively) gets ``<output-dir>/<same subfolders>/<stem>.wav``,
the file a dataset's ``[dataset.audio] path`` matches to it by stem. Videos without an audio
stream are skipped and counted. ``--strip-audio`` then rewrites each extracted video without its
audio (stream copy; the new file replaces the original only once it is complete).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtune extract-audio",
                                description="16 kHz mono WAV per video, matched by file stem")
    p.add_argument("--input-dir", required=True, type=Path, help="folder of videos (searched recursively)")
    p.add_argument("--output-dir", required=True, type=Path, help="where the .wav files go (same subfolders)")
    p.add_argument("--strip-audio", action="store_true",
                   help="remove the audio track from each video after extracting it (atomic rewrite)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..data.audio import NoAudio, decode_audio, strip_audio, write_wav
    from ..data.discover import list_media

    args = build_parser().parse_args(argv)
    if not args.input_dir.is_dir():
        print(f"vidtune extract-audio: --input-dir {args.input_dir} is not a directory", file=sys.stderr)
        return 2
    videos = list_media(args.input_dir, "video")
    written, no_audio, failed = 0, [], []
    for video in videos:
        out = args.output_dir / video.relative_to(args.input_dir).with_suffix(".wav")
        try:
            write_wav(decode_audio(video), out)
            written += 1
            if args.strip_audio:
                strip_audio(video)
        except NoAudio:
            no_audio.append(video.name)
        except Exception as exc:  # one bad file is counted, the rest still extract
            failed.append(f"{video.name} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    print(f"extract-audio: {len(videos)} video(s), {written} WAV file(s) written to {args.output_dir}"
          f"{' (audio stripped from the videos)' if args.strip_audio else ''}, {len(no_audio)} without audio "
          f"skipped{': ' + ', '.join(no_audio[:5]) if no_audio else ''}, {len(failed)} failed"
          f"{': ' + ', '.join(failed[:5]) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
