"""gdn-exp's Hydra launcher (`hydra/launcher=local`): see `local_launcher`."""
