"""What every part needs from the process and the disk: data and cache paths, safe output folders, allocator settings, typed JSON arguments."""
