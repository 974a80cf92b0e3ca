from ser_ray.audio.decode import AudioError, decode_audio, fix_length, load_clip, resample, to_mono

__all__ = ["AudioError", "decode_audio", "fix_length", "load_clip", "resample", "to_mono"]
