# A first look in seconds: the whole path (data, training steps, checkpoints, the sample grids, progress.gif,
# loss.png) on 640 of the built-in shapes for 2 epochs; 11 to 12 s on a 2-core AMD Zen 5, fp32 or bf16. Its grids
# are blobs, not shapes yet: that takes the default run (33 minutes on a 2-core CPU without bf16).
#     python ddpm_conditional.py config/first_look.py    # models/first_look, results/first_look
#     python ddpm.py config/first_look.py                # models/first_look_uncond, results/first_look_uncond
RUN_NAME = "first_look"
NUM_IMAGES = 640
EPOCHS = 2
