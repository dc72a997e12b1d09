// Stand-in for CUDA's <cuda_bf16.h> in the simulator build (csrc/cudasim/sim.h).
#pragma once
#include "cudasim/sim.h"
