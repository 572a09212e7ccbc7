"""Every file and folder name that a model folder, a run folder or an output folder holds,
spelled once. The modules that write and read them import the names from here; where they go
and which belong together is `model.run_folder`'s (`RunFolder`), and a model folder's own
checks are `io.checkpoint`'s.
"""

# A model folder (RUN/vae, RUN/refiner, a published model)
CONFIG_NAME = "config.json"  # the network's config, its kind and (refiner) the diffusion
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
TRAINER_STATE_NAME = "trainer_state.pt"  # optimiser, EMA and step: never exported
MANIFEST_NAME = "manifest.json"  # each file's size and SHA-256
TRAIN_CONFIG_NAME = "train_config.json"  # the resolved config a stage was trained with
LOG_NAME = "log.csv"  # the losses of a training run
ENVIRONMENT_NAME = "environment.json"  # versions, device, seed of every session of a run
LOCK_NAME = ".diffusevae.lock"  # held by the one writer of a folder
IMPORT_PARTIAL = ".diffusevae-import"  # import-official builds vae/ and refiner/ in it first
MODEL_CARD = "MODEL.md"  # a published model: the commands read it and never write into it

# A run folder's other parts
PRIOR_DIR = "prior"
PRIOR_JSON = "prior.json"  # a fitted Ex-PDE prior's record
GMM_FILE = "gmm.safetensors"  # its mixture: weights, means, covariances
ATTRIBUTES_DIR = "attributes"
DIRECTIONS_FILE = "directions.safetensors"  # one direction in z per attribute
NAMES_FILE = "names.json"  # the attributes' names, in the order of the directions
CLASSIFIER_DIR = "classifier"
SAMPLING_DEFAULTS = "sampling_defaults.json"  # the settings it is sampled with by default

# What the output commands write in their folders
IMAGES_DIR = "images"
X_HAT_DIR = "x_hat"
INVERTED_DIR = "inverted"
GRID_PNG = "grid.png"
STAGES_PNG = "stages.png"
SAMPLES_NPZ = "samples.npz"  # images, z, x_hat
LATENTS_NPZ = "latents.npz"  # z and y_T of inverted images
SAMPLING_RECORD = "sampling.json"  # settings, environment, samples done, complete
RECORDS = {"sample-vae": "sample-vae.json", "reconstruct": "reconstruct.json",
           "refine": "refine.json",
           "interpolate": "interpolate.json", "edit": "edit.json"}  # each command's settings
METRICS_JSON = "metrics.json"  # what `evaluate` measured
LIKELIHOOD_SCORES = "scores.csv"  # `likelihood`: a row an image
LIKELIHOOD_RECORD = "likelihood.json"  # its settings and summary
LIKELIHOOD_HISTOGRAM = "histogram.png"
DIRECTIONS_CACHE = "latent_directions.safetensors"  # the explorer's principal directions
DIRECTIONS_CACHE_RECORD = "latent_directions.json"  # what they were computed from

OUTPUTS_ROOT = "diffusevae-outputs"  # a read-only run's outputs: OUTPUTS_ROOT/<run name>/...
# Where each output command writes when not given an output folder, relative to the run folder.
OUTPUT_DIRS = {"sample": "samples", "sample-vae": "vae_samples",
               "reconstruct": "reconstructions", "refine": "refined",
               "interpolate": "interpolation", "edit": "edit", "evaluate": "eval",
               "explore": "explore", "sweep": "sweep", "likelihood": "likelihood"}
# What an output command wrote in its folder: `overwrite` removes these alone.
OUTPUTS_RECORD = ".diffusevae-outputs.json"
