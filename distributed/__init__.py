"""Worker processes and collectives (torchrun launcher, job channel, parallel strategies)."""
