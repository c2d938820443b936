class GgufAbliterate < Formula
  desc "Remove the refusal direction from quantized GGUF chat models"
  homepage "https://github.com/gguf-abliterate/gguf-abliterate"
  url "https://github.com/gguf-abliterate/gguf-abliterate/archive/refs/tags/v0.1.0.tar.gz"
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  license any_of: ["MIT", "Apache-2.0"]
  head "https://github.com/gguf-abliterate/gguf-abliterate.git", branch: "main"

  depends_on "cmake" => :build
  depends_on "rust" => :build

  uses_from_macos "llvm" => :build # libclang for bindgen

  def install
    features = OS.mac? ? ["--features", "metal"] : []
    system "cargo", "install", *std_cargo_args, *features
  end

  test do
    # A tiny GGUF: one F32 tensor, no metadata beyond the architecture.
    gguf = testpath/"tiny.gguf"
    kv_key = "general.architecture"
    kv_val = "llama"
    name = "token_embd.weight"
    header = ["GGUF", 3, 1, 1].pack("a4L<Q<Q<")
    header += [kv_key.bytesize].pack("Q<") + kv_key + [8].pack("L<") + [kv_val.bytesize].pack("Q<") + kv_val
    header += [name.bytesize].pack("Q<") + name + [2, 4, 2, 0, 0].pack("L<Q<Q<L<Q<")
    header += "\0" * ((32 - (header.bytesize % 32)) % 32)
    gguf.binwrite(header + ([0.5] * 8).pack("e*"))
    output = shell_output("#{bin}/gguf-abliterate inspect #{gguf}")
    assert_match "architecture:  llama", output
    assert_match "token_embd.weight", output
  end
end
