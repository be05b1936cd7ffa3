use candle_core::Device;
use candle_retinanet::bench;
use candle_retinanet::config::Config;
fn main() -> anyhow::Result<()> {
    candle_retinanet::runtime::configure();
    let config = Config::resolve(
        Some("shapes"),
        &[
            "model.num_classes=3".into(),
            "model.anchors.ratios=[1.0]".into(),
            "model.anchors.sizes=[8,16,32,64,128]".into(),
        ],
    )?;
    let r = bench::run(config, bench::BenchMode::Train, 192, 16, 6, &Device::Cpu)?;
    println!("{r:?}");
    Ok(())
}
