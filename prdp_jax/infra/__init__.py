"""Infrastructure: sharding over the device mesh, process and device set-up, atomic files,
metrics output, user-facing errors and progress bars."""
