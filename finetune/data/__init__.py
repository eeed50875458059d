"""Image folders: decode (one guarded reader), transforms, index (scan and split), loader."""
