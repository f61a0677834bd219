"""Weight import: diffusers folders and CompVis checkpoints into our parameter trees."""
