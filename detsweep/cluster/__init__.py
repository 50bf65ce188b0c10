"""The Ray edges, and the only package that imports ray: `tuner` (connect, build or restore the Tuner,
the Tune function trainable), `callback` (results rows on the driver), `progress` (the compact
console view), `worker` (the Ray Train function, as named steps)."""
