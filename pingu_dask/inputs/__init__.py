"""Files in: images (nibabel), manifests, BIDS datasets -> Scan records."""
