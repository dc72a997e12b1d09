// Stand-in for CUDA's <cuda_fp16.h> in the simulator build (csrc/cudasim/sim.h).
#pragma once
#include "cudasim/sim.h"
