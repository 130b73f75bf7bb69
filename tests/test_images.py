"""Image loading: every PIL mode to RGB with the right pixels, the guards and their reasons, LLaVA padding."""

from __future__ import annotations

import io
import struct
import types
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

from c3l_jax.data.images import (ImageError, apply_image_aspect, expand_to_square, load_image,
                                 load_image_bytes, pad_background)


def encode(img: PIL.Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def pixels(img: PIL.Image.Image) -> list:
  assert img.mode == "RGB"
  return np.asarray(img).tolist()


def test_grey_bilevel_and_alpha_modes_become_rgb():
  grey = PIL.Image.frombytes("L", (2, 1), bytes([0, 77]))
  assert pixels(load_image_bytes(encode(grey))) == [[[0, 0, 0], [77, 77, 77]]]

  bilevel = PIL.Image.frombytes("1", (8, 1), bytes([0b10100000]))
  assert PIL.Image.open(io.BytesIO(encode(bilevel))).mode == "1"
  got = pixels(load_image_bytes(encode(bilevel)))
  assert [p[0] for p in got[0]] == [255, 0, 255, 0, 0, 0, 0, 0] and all(len(set(p)) == 1 for p in got[0])

  # Alpha is dropped (LLaVA's .convert("RGB")): a fully transparent pixel keeps its stored colour.
  rgba = PIL.Image.frombytes("RGBA", (2, 1), bytes([10, 20, 30, 0, 200, 100, 50, 255]))
  assert pixels(load_image_bytes(encode(rgba))) == [[[10, 20, 30], [200, 100, 50]]]

  la = PIL.Image.frombytes("LA", (2, 1), bytes([50, 0, 180, 255]))
  assert PIL.Image.open(io.BytesIO(encode(la))).mode == "LA"
  assert pixels(load_image_bytes(encode(la))) == [[[50, 50, 50], [180, 180, 180]]]


def test_palette_with_transparency_becomes_rgb_without_warnings():
  pal = PIL.Image.new("P", (3, 1))
  pal.putpalette([255, 0, 0, 0, 0, 255, 0, 200, 0] + [0] * (768 - 9))
  for x, index in enumerate([0, 1, 2]):
    pal.putpixel((x, 0), index)
  single = encode(pal, transparency=1)  # one transparent index
  several = encode(pal, transparency=bytes([255, 0, 128]))  # per-index alpha (tRNS with several entries)
  for data in (single, several):
    reopened = PIL.Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      got = load_image_bytes(data)
    assert pixels(got) == [[[255, 0, 0], [0, 0, 255], [0, 200, 0]]]


def test_cmyk_becomes_rgb():
  cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 128, 0, 64), (40, 80, 120, 20)]
  img = PIL.Image.frombytes("CMYK", (len(cmyk), 1), bytes(v for p in cmyk for v in p))
  # (255 - C) * (255 - K) / 255 per channel, by hand: white, cyan, black, ...
  want = [[round((255 - p[i]) * (255 - p[3]) / 255) for i in range(3)] for p in cmyk]
  assert want[:3] == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
  got = np.asarray(load_image_bytes(encode(img, "TIFF")), dtype=int)[0]
  assert np.abs(got - np.array(want)).max() <= 1, (got, want)
  # A CMYK JPEG (Adobe, inverted on disk) as COCO has a few of: flat colour blocks survive compression.
  block = PIL.Image.new("CMYK", (16, 16), (0, 128, 0, 64))
  data = encode(block, "JPEG", quality=100)
  assert PIL.Image.open(io.BytesIO(data)).mode == "CMYK"
  got = np.asarray(load_image_bytes(data), dtype=int)
  assert np.abs(got - np.array([191, 95, 191])).max() <= 3


def test_sixteen_bit_and_wide_modes_become_rgb():
  values = np.array([[1000, 257 * 100, 257 * 200, 257 * 250]], dtype=np.uint16)  # not 0..65535: scaling
  # by full range and a min..max stretch differ
  img16 = PIL.Image.fromarray(values)
  assert img16.mode == "I;16" and PIL.Image.open(io.BytesIO(encode(img16))).mode == "I;16"
  got = np.asarray(load_image_bytes(encode(img16)))
  assert got[..., 0].tolist() == [[4, 100, 200, 250]]  # v * 255 / 65535, not PIL's clip to 255
  assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()

  img16b = PIL.Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
  assert np.asarray(load_image_bytes(encode(img16b, "TIFF")))[..., 0].tolist() == [[4, 100, 200, 250]]

  eight_in_i = PIL.Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
  assert eight_in_i.mode == "I"
  assert np.asarray(load_image_bytes(encode(eight_in_i, "TIFF")))[..., 0].tolist() == [[0, 100, 255]]
  wide_i = PIL.Image.fromarray(np.array([[-100, 50, 200]], dtype=np.int32))  # outside 0..65535: min..max
  assert np.asarray(load_image_bytes(encode(wide_i, "TIFF")))[..., 0].tolist() == [[0, 128, 255]]
  floats = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32))
  assert floats.mode == "F"
  assert np.asarray(load_image_bytes(encode(floats, "TIFF")))[..., 0].tolist() == [[0, 128, 255, 64]]


def test_exif_orientation_is_applied():
  img = PIL.Image.new("RGB", (16, 8), (255, 0, 0))
  img.paste((0, 0, 255), (8, 0, 16, 8))  # left red, right blue
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  got = load_image_bytes(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
  assert got.size == (8, 16)
  arr = np.asarray(got, dtype=int)
  assert np.abs(arr[2, 4] - [255, 0, 0]).max() < 40  # the left edge is now the top
  assert np.abs(arr[13, 4] - [0, 0, 255]).max() < 40
  plain = load_image_bytes(encode(img, "JPEG", quality=95))
  assert plain.size == (16, 8)


def png_with_header_size(width: int, height: int) -> bytes:
  """A 1x1 PNG whose IHDR claims width x height (CRC fixed): the pixel data is far too short."""
  data = bytearray(encode(PIL.Image.new("RGB", (1, 1), (1, 2, 3))))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def test_decompression_bomb_guard_fires_from_the_header(monkeypatch):
  loads = []
  real_load = PIL.PngImagePlugin.PngImageFile.load
  monkeypatch.setattr(PIL.PngImagePlugin.PngImageFile, "load",
                      lambda self: (loads.append(self.size), real_load(self))[1])
  # Under PIL's own limit, over ours: refused with no decoding (the data would be "truncated").
  with pytest.raises(ImageError, match=r"9000x9000 pixels, over the limit of 64000000") as e:
    load_image_bytes(png_with_header_size(9000, 9000), name="bomb.png")
  assert e.value.kind == "too-large" and "bomb.png" in str(e.value)
  # Over PIL's warning threshold (89.5M): max_pixels decides, not the warning.
  with pytest.raises(ImageError, match=r"over the limit of 64000000"):
    load_image_bytes(png_with_header_size(10_000, 10_000))
  assert loads == []
  with pytest.raises(ImageError, match="corrupt or truncated"):
    load_image_bytes(png_with_header_size(10_000, 10_000), max_pixels=150_000_000)
  assert loads == [(10_000, 10_000)]
  # Over twice PIL's limit: PIL's DecompressionBombError, whatever max_pixels says.
  with pytest.raises(ImageError, match="over the pixel limit") as e:
    load_image_bytes(png_with_header_size(20_000, 20_000), max_pixels=10**10)
  assert e.value.kind == "too-large" and len(loads) == 1
  # A real small image over a small limit.
  with pytest.raises(ImageError, match=r"20x10 pixels, over the limit of 100"):
    load_image_bytes(encode(PIL.Image.new("RGB", (20, 10))), max_pixels=100)
  assert load_image_bytes(encode(PIL.Image.new("RGB", (20, 10))), max_pixels=200).size == (20, 10)


def test_bad_bytes_and_files_give_reasons(tmp_path):
  with pytest.raises(ImageError, match="^zero-byte file: no image bytes for x.jpg$") as e:
    load_image_bytes(b"", name="x.jpg")
  assert e.value.kind == "zero-byte"
  with pytest.raises(ImageError, match="^not an image file notes.jpg$") as e:
    load_image_bytes(b"plain text, not an image\n", name="notes.jpg")
  assert e.value.kind == "not-an-image"
  jpeg = encode(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
                "JPEG")
  assert load_image_bytes(jpeg).size == (64, 64)
  with pytest.raises(ImageError, match="^corrupt or truncated image <bytes>: ") as e:
    load_image_bytes(jpeg[: len(jpeg) // 2])
  assert e.value.kind == "corrupt"
  with pytest.raises(ImageError, match="corrupt or truncated"):
    load_image_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")

  # load_image keeps its path messages.
  with pytest.raises(ImageError, match="^missing image file .*nope.png$"):
    load_image(str(tmp_path / "nope.png"))
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ImageError, match="^zero-byte image file .*empty.png$"):
    load_image(str(tmp_path / "empty.png"))
  (tmp_path / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  with pytest.raises(ImageError, match="^corrupt or truncated image .*half.jpg: "):
    load_image(str(tmp_path / "half.jpg"))
  (tmp_path / "ok.png").write_bytes(encode(PIL.Image.frombytes("L", (1, 1), bytes([9]))))
  assert pixels(load_image(str(tmp_path / "ok.png"))) == [[[9, 9, 9]]]


def test_expand_to_square_matches_llava():
  bg = (1, 2, 3)
  red = (200, 0, 0)
  wide = expand_to_square(PIL.Image.new("RGB", (5, 2), red), bg)
  assert wide.size == (5, 5)
  rows = np.asarray(wide)[:, 0].tolist()  # offset (5 - 2) // 2 = 1 from the top
  assert rows == [list(bg), list(red), list(red), list(bg), list(bg)]
  assert (np.asarray(wide)[1:3] == red).all()
  tall = expand_to_square(PIL.Image.new("RGB", (2, 5), red), bg)
  assert tall.size == (5, 5)
  assert np.asarray(tall)[0].tolist() == [list(bg), list(red), list(red), list(bg), list(bg)]
  square = PIL.Image.new("RGB", (3, 3), red)
  assert expand_to_square(square, bg) is square


def test_pad_background_and_image_aspect():
  clip = types.SimpleNamespace(image_mean=[0.48145466, 0.4578275, 0.40821073])
  assert pad_background(clip) == (122, 116, 104)  # int(): 122.77, 116.75, 104.09 truncated
  assert pad_background(types.SimpleNamespace(image_processor=clip)) == (122, 116, 104)
  img = PIL.Image.new("RGB", (4, 2), (9, 9, 9))
  assert apply_image_aspect(img, "resize", clip) is img
  padded = apply_image_aspect(img, "pad", clip)
  assert padded.size == (4, 4) and padded.getpixel((0, 0)) == (122, 116, 104)
  assert padded.getpixel((0, 1)) == (9, 9, 9)
  with pytest.raises(ValueError, match="image_aspect"):
    apply_image_aspect(img, "crop", clip)
