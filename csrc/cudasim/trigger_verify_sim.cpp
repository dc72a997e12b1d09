// trigger_verify_cuda.cu built for the host against the CUDA simulator (sim.h).
#include "cuda/trigger_verify_cuda.cu"
