// Stand-in for CUDA's <math_constants.h> in the simulator build (csrc/cudasim/sim.h).
#pragma once
#include "cudasim/sim.h"
