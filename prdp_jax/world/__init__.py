"""The embedded world: procedural captioned images, a black-box alignment reward, a base model."""
