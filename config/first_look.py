# A first look in about a minute on a 2-core CPU: the whole path (data, training steps, checkpoints, the sample
# grids, progress.gif, loss.png) on 640 of the built-in shapes for 2 epochs. Its grids are blobs, not shapes yet: that
# takes the default run (33 minutes).
#     python ddpm_conditional.py config/first_look.py    # models/first_look, results/first_look
#     python ddpm.py config/first_look.py                # models/first_look_uncond, results/first_look_uncond
RUN_NAME = "first_look"
NUM_IMAGES = 640
EPOCHS = 2
