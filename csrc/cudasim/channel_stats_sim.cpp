// channel_stats_cuda.cu built for the host against the CUDA simulator (sim.h).
#include "cuda/channel_stats_cuda.cu"
