"""What the sites run inside NVFlare jobs: the one round loop (core), rank 0 leading the other ranks of a
multi-GPU site (distributed), and the backends — hf/, nemo/ and toy/, each in its own tree."""
