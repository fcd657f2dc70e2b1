"""Foundation-model detectors (CLIP, vision-language models)."""
