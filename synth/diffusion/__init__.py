"""Learned defect generation (extra ``pixelvision[diffusion]``): ControlNet inpainting and CSM semantic guidance.

Layout follows diffusers: ``components`` loads the frozen Stable Diffusion inpainting parts (hub id or local
folder, clear error offline), ``tiny`` writes a small random model in the same folder layout for tests and smoke
runs, and each generation method keeps its training and its pipeline in one readable file.
"""
