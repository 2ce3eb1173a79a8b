//! Image + caption folders for text-to-image training, laid out as diffusers' and kohya's
//! training scripts read them: `root/NAME.png|jpg|jpeg` with its caption in `root/NAME.txt`
//! (one caption, surrounding whitespace dropped). Files are sorted by name; every image is
//! resized to a square and read as RGB (the VAE's 3 channels).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::folder::{decode_as, is_image_name};
use super::read::{list_dir, read_capped};
use super::{DataError, Dataset};

/// The images (as a [`Dataset`] whose label `i` is caption `i`: one caption per image, in file
/// order) and their captions.
pub fn load_captioned(root: &Path, resolution: usize) -> Result<(Dataset, Vec<String>), DataError> {
    if resolution == 0 {
        return Err(DataError::malformed(
            root,
            "target resolution must be at least 1",
        ));
    }
    let (files, _) = list_dir(root)?;
    let images: Vec<PathBuf> = files
        .iter()
        .filter(|n| is_image_name(n))
        .map(|n| root.join(n))
        .collect();
    if images.is_empty() {
        return Err(DataError::Empty {
            path: root.to_path_buf(),
            reason: "no .png/.jpg/.jpeg images (expected root/NAME.png with its caption in root/NAME.txt)".into(),
        });
    }
    let mut captions = Vec::with_capacity(images.len());
    for img in &images {
        let txt = img.with_extension("txt");
        if !txt.is_file() {
            return Err(DataError::malformed(
                img,
                format!("no caption: {} is missing", txt.display()),
            ));
        }
        let bytes = read_capped(&txt)?;
        let caption = String::from_utf8(bytes)
            .map_err(|_| DataError::malformed(&txt, "the caption is not UTF-8"))?
            .trim()
            .to_string();
        captions.push(caption);
    }
    let decoded: Vec<_> = images
        .par_iter()
        .map(|f| decode_as(f, Some(resolution), true))
        .collect();
    let mut pixels = Vec::with_capacity(images.len() * 3 * resolution * resolution);
    for d in decoded {
        pixels.extend_from_slice(&d?.chw);
    }
    let n = images.len();
    Ok((
        Dataset {
            images: super::scale_u8(&pixels),
            labels: (0..n as u32).collect(),
            channels: 3,
            height: resolution,
            width: resolution,
            num_classes: n,
            class_names: captions.clone(),
            source: format!("image+caption folder {}", root.display()),
        },
        captions,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, side: u32, v: u8) {
        image::GrayImage::from_pixel(side, side, image::Luma([v]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn images_pair_with_their_captions_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("b.png"), 8, 255);
        std::fs::write(d.path().join("b.txt"), "  a white square\n").unwrap();
        write_png(&d.path().join("a.png"), 4, 0);
        std::fs::write(d.path().join("a.txt"), "a black square").unwrap();
        let (ds, caps) = load_captioned(d.path(), 4).unwrap();
        assert_eq!(caps, ["a black square", "a white square"]);
        assert_eq!((ds.len(), ds.channels, ds.height), (2, 3, 4));
        // Grayscale read as RGB; pixels scaled to [-1, 1].
        assert!(ds.images[..48].iter().all(|&p| p == -1.0));
        assert!(ds.images[48..].iter().all(|&p| p == 1.0));
    }

    #[test]
    fn an_image_without_its_caption_is_named() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("x.png"), 4, 10);
        let e = load_captioned(d.path(), 4).unwrap_err().to_string();
        assert!(e.contains("x.txt is missing"), "{e}");
        let e = load_captioned(&d.path().join("nope"), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
