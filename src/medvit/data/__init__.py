"""MedMNIST data: files on disk, the DataModule, and the augmentation presets."""

import os

# albumentations pings PyPI for a newer version on import; that stalls every DataLoader worker on
# offline or firewalled clusters, so opt out unless the user has decided otherwise. Set here, in
# the package, so it runs before any module of it imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
