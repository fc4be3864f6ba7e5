# The DDPM tutorial's setting (its conditional script): CIFAR-10 at 64x64, its full-size UNet (23 M parameters, the
# keys of its checkpoints), its objective and its sampler. A GPU run: about 6 s a step of 14 images on a 2-core CPU.
#     python ddpm_conditional.py config/tutorial.py
# Left as the scripts have them: the labels are dropped per sample (the tutorial dropped a whole batch's at
# once), images are flipped rather than randomly cropped, and AMP picks bf16 or fp16 where the machine has it
# (--amp False: the tutorial's fp32). NUM_CLASSES: CIFAR-10's 10, as the tutorial's.
RUN_NAME = "tutorial"
DATASET = "cifar10"
IMG_SIZE = 64
WIDTH = 64
ATTENTION = (1, 2, 4, 8)
EPOCHS = 300
BATCH_SIZE = 14
LR = 3e-4
CFG_DROP = 0.1
CFG_SCALE = 3.0
EMA_BETA = 0.995
EMA_START = 2000
NORM_GROUPS = 1
FILM = False
SCHEDULE = "linear"
PREDICTION = "eps"
LOSS_WEIGHTING = "none"
TIMESTEPS = "uniform"
LR_WARMUP = 0
LR_SCHEDULE = "constant"
OPTIMIZER = "adamw"
SAMPLER = "ancestral"
SAMPLE_STEPS = 1000
