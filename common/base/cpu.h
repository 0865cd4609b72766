/* Instruction sets a process is told not to use: PEFTPS_CPU_DISABLE lists
 * them, comma separated (e.g. "avx2,avx512bf16"), so that tests and users
 * can run the paths a CPU without them takes. The kernels that choose a path
 * by CPU (model/bf16.c, train/optim.c) ask here as well as the CPU. */
#ifndef PEFTPS_CPU_H
#define PEFTPS_CPU_H

/* Whether PEFTPS_CPU_DISABLE names `isa` (case-insensitive). */
int cpu_disabled(const char *isa);

#endif
