"""Files that survive crashes and full disks: safetensors read and written tensor by tensor, fsynced
atomic writes, and the writability check of an output folder."""
