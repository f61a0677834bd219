"""Diffusion maths: noise schedules (`schedules`), training objectives (`objectives`) and samplers
(`samplers`: DDIM, PLMS, ancestral DDPM, DPM-Solver++ as one `lax.scan` each)."""
