import { defineToolkit } from "@assistant-ui/react";
import { z } from "zod";

declare global {
  interface Window {
    weatherRuns?: number;
  }
}

// A frontend tool, declared as assistant-ui's example declares it: the backend asks, the browser runs it.
export default defineToolkit({
  get_weather: {
    description: "Get the current weather for a city",
    parameters: z.object({ location: z.string().describe("The city to get weather for") }),
    execute: async ({ location }) => {
      window.weatherRuns = (window.weatherRuns ?? 0) + 1;
      return { location, temperature: 21, unit: "celsius", condition: "sunny" };
    },
    render: ({ args, result }) => (
      <div className="tool">
        {result ? `${args.location}: ${result.temperature}° ${result.unit}, ${result.condition}` : `Getting weather for ${args.location ?? "…"}`}
      </div>
    ),
  },
});
