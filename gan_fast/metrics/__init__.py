"""Sample-quality metrics (docs/quality.md): the distances between feature distributions
(distances.py), the offline digits metric (digits.py) and FID/KID over Inception features (fid.py).
gan_fast.eval measures them on a generator."""
