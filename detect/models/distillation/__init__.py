"""Knowledge-distillation detectors: a student network trained to match a frozen pretrained teacher."""
