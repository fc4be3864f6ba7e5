"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022) and an EMA copy of the weights.

    python ddpm_conditional.py                          # the built-in "shapes" data: about 10 minutes on a laptop CPU
    python ddpm_conditional.py --dataset cifar10 --img_size 64 --width 64 --attention 1,2,4,8 --epochs 300

Every UPPERCASE constant below is also a command-line option of the same name in lower case. The training loop is
ddpm.train (shared with ddpm.py); what makes it conditional: the UNet embeds the class label, each sample's label is
dropped to the null condition with probability CFG_DROP while training, and sampling mixes the conditional and
unconditional predictions with CFG_SCALE. Checkpoints: models/<RUN_NAME>/{ckpt,ema_ckpt,train_state}.pt; grids (one
row per class) and the loss curve: results/<RUN_NAME>/. Running the same command again resumes.
"""
from ddpm import main

# --- data ---
RUN_NAME = "DDPM_conditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
DATASET = "shapes"        # "shapes" (built in), "cifar10", "mnist", "fashion_mnist", a FER-2013 .csv, or a folder
DATA_DIR = "data"         # where torchvision datasets are downloaded to / looked for
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
IMG_SIZE = 32             # int, or (height, width); divisible by 8
CHANNELS: int | None = None  # None: the dataset's (1 grayscale, 3 RGB)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (on, but off for mnist)
NUM_CLASSES: int | None = None  # None: the dataset's
# --- model ---
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors; tutorial: (1, 2, 4, 8), all six blocks
# --- diffusion ---
NOISE_STEPS = 1000        # T
BETA_START, BETA_END = 1e-4, 0.02
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020, the tutorial's)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022), "eps" (the tutorial's) or "x0"
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023) or "none" (plain MSE, the tutorial's)
MIN_SNR_GAMMA = 5.0
# --- training ---
EPOCHS = 24
BATCH_SIZE = 32
LR = 2e-3                 # tutorial: 3e-4
CFG_DROP = 0.1            # probability that a sample's label is replaced by the null condition
CFG_SCALE = 3.0           # guidance scale of the sample grids: 1 conditional, 0 unconditional, >1 guided
EMA_BETA = 0.995
EMA_START = 1000          # steps during which the EMA model just copies the weights; tutorial: 2000
SAMPLE_STEPS = 50         # DDIM steps for the sample grid written after each epoch
SAVE_EVERY = 0            # also save every N steps within an epoch (0: only at the end of each epoch)
LOG_EVERY = 25            # steps between loss readouts (each one waits for the device)
SEED = 0
# --- machine ---
DEVICE = "auto"           # "auto": CUDA, else Apple MPS, else CPU
AMP: bool | str = True   # mixed precision: bf16 where native, fp16 on older CUDA GPUs, else fp32; or "fp16"/"bf16"
CHANNELS_LAST = True      # channels-last memory format: faster convolutions on CPUs and tensor-core GPUs
COMPILE = False           # torch.compile the model
NUM_WORKERS = 4           # DataLoader workers for image folders (in-memory datasets need none)

if __name__ == "__main__":
    main(globals(), conditional=True)
