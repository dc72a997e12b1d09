// magnitude_select_cuda.cu built for the host against the CUDA simulator (sim.h).
#include "cuda/magnitude_select_cuda.cu"
