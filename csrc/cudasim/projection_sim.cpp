// projection_cuda.cu built for the host against the CUDA simulator (sim.h).
#include "cuda/projection_cuda.cu"
