// Stand-in for CUDA's <cuda_runtime.h> in the simulator build (csrc/cudasim/sim.h).
#pragma once
#include "cudasim/sim.h"
