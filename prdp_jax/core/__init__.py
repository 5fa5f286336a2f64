"""The algorithm as pure functions: the diffusion step and its log-prob, the scan sampler, the
PRDP and DDPO objectives, and the exact tiled gradient."""
