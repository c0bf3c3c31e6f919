//! What every plot shares: the font, the size, the colours, and PNG + SVG from one drawing.
//!
//! Text uses DejaVu Sans, bundled in `assets/fonts/` (Bitstream Vera licence, redistribution
//! allowed, see `LICENSE-DejaVu.txt`) and registered from bytes through plotters' `ab_glyph`
//! feature: no fontconfig/freetype system library and no system font are needed at build or
//! run time, so plots look the same on a developer's machine and in CI.

use std::sync::Once;

use plotters::prelude::*;

pub(crate) const FONT: &str = "sans-serif";
pub(crate) const SIZE: (u32, u32) = (1100, 700);
pub(crate) const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub(crate) fn register_font() {
    static DONE: Once = Once::new();
    DONE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        let ok = plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok();
        assert!(ok, "the bundled DejaVu Sans does not parse");
    });
}

/// Draws `$draw(area, data)` into `OUT/STEM.png` and `OUT/STEM.svg`.
macro_rules! png_and_svg {
    ($out:expr, $stem:expr, $size:expr, $draw:ident, $data:expr) => {{
        let png = $out.join(format!("{}.png", $stem));
        let area = BitMapBackend::new(&png, $size).into_drawing_area();
        $draw(&area, $data).with_context(|| format!("cannot draw {}", png.display()))?;
        area.present()
            .with_context(|| format!("cannot write {}", png.display()))?;
        let svg = $out.join(format!("{}.svg", $stem));
        let area = SVGBackend::new(&svg, $size).into_drawing_area();
        $draw(&area, $data).with_context(|| format!("cannot draw {}", svg.display()))?;
        area.present()
            .with_context(|| format!("cannot write {}", svg.display()))?;
    }};
}
pub(crate) use png_and_svg;
