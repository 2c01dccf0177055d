"""Sampling: videos with the trained transformer, decoding and saving them."""
from .sana import pipeline_scheduler, sample_sana
from .sampler import (decode, initial_latents, load_prompts, load_scheduler_config, make_scheduler, sample,
                      save_comparison_sheet, save_contact_sheet, save_outputs, save_video)

__all__ = ["decode", "initial_latents", "load_prompts", "load_scheduler_config", "make_scheduler", "pipeline_scheduler",
           "sample", "sample_sana", "save_comparison_sheet", "save_contact_sheet", "save_outputs", "save_video"]
