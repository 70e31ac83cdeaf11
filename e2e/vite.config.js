import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

export default defineConfig({
  root: "page",
  plugins: [react()],
  // A development build: React's and convertLangChainMessages' warnings (an unknown message type, a
  // missing key) only exist there, and the browser check fails on any console warning.
  mode: "development",
  define: { "process.env.NODE_ENV": JSON.stringify("development") },
  build: { outDir: "../dist", emptyOutDir: true, minify: false, chunkSizeWarningLimit: 8000 },
  logLevel: "warn",
});
