"""qcfs_snntorch's main job: timm model → QCFS ANN → SNN → accuracy at every T → fine-tuned SNN.

    accelerate launch launch.py                                   # recipe "quickstart"
    accelerate launch launch.py recipe=cifar10_jpeg_cpu train.epochs=5
    python launch.py --help                                       # every key: type, default, meaning
    python launch.py --dry-run recipe=cifar10_jpeg_cpu            # resolved config and plan, runs nothing

The application lives in the package (qcfs_snntorch/pipeline); ``qcfs-snntorch`` is the
same command once the package is installed.
"""

import sys

from qcfs_snntorch.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
