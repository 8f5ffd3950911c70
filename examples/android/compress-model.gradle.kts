// Export the model to ONNX Runtime's mobile format at build time and ship it as app assets.
//
// Apply from the app module's build.gradle.kts:   apply(from = "compress-model.gradle.kts")
// (or paste the block below into it). Needs, on the build machine: `compress` on PATH (pip install -e . in this
// repo, torch==2.13.0 first) or -Pcompress.exe=/path/to/venv/bin/compress.
//
// What ends up in src/main/assets (the names are fixed by `-o .../model.ort`):
//   model.ort                          the model, ORT format (pre-optimized flatbuffer: onnxruntime-android loads it)
//   model.required_operators.config    ops the model needs: input to a reduced ORT build (see README.md)
//   model.json                         inputs/outputs, normalization, labels, precision, sha256 of model.ort
//
// `compress export` writes all three or none (atomic; the .ort only after it matched torch), and exits non-zero
// on a bad input (2) or a failed parity check (1), which fails this task and the build.

val compressExe: String = (findProperty("compress.exe") as String?) ?: "compress"
// The trained model and its architecture: a state dict + --arch, or a model saved by compress (prune/quantize).
val compressModel = layout.projectDirectory.file((findProperty("compress.model") as String?) ?: "../models/resnet20-12fca82f.th")
val compressArch: String = (findProperty("compress.arch") as String?) ?: "resnet20"
val compressPrecision: String = (findProperty("compress.precision") as String?) ?: "auto"  // auto | fp32 | int8 (quantized models)
val modelAssets = layout.projectDirectory.dir("src/main/assets")

val exportOrtModel by tasks.registering(Exec::class) {
    group = "model"
    description = "compress export --format ort into src/main/assets (model.ort, model.required_operators.config, model.json)"
    inputs.file(compressModel)
    inputs.property("arch", compressArch)
    inputs.property("precision", compressPrecision)
    outputs.files(
        modelAssets.file("model.ort"),
        modelAssets.file("model.required_operators.config"),
        modelAssets.file("model.json"),
    )
    commandLine(
        compressExe, "-q", "export", compressModel.asFile.absolutePath,
        "--arch", compressArch,
        "--format", "ort",
        "--precision", compressPrecision,
        "-o", modelAssets.file("model.ort").asFile.absolutePath,
    )
}

// Every build (assembleDebug, bundleRelease, ...) exports first; Gradle skips it while the inputs are unchanged.
tasks.named("preBuild") { dependsOn(exportOrtModel) }
